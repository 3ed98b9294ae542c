/**
 * Errors that carry a code the CLI and the gRPC layer understand. The code names map one to one
 * onto gRPC status codes (see grpcError in manager/grpc.ts).
 */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'FAILED_PRECONDITION'
  | 'PERMISSION_DENIED'
  | 'UNAVAILABLE'
  | 'RESOURCE_EXHAUSTED'
  | 'ABORTED'
  | 'DEADLINE_EXCEEDED'
  | 'OUT_OF_RANGE'
  | 'INTERNAL';

export class FlotillaError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'FlotillaError';
  }
}

export const invalidArgument = (field: string, value: unknown, why: string): FlotillaError =>
  new FlotillaError('INVALID_ARGUMENT', `invalid ${field} ${JSON.stringify(value)}: ${why}`);

export const notFound = (what: string, id: string): FlotillaError =>
  new FlotillaError('NOT_FOUND', `${what} ${JSON.stringify(id)} not found`);

export const alreadyExists = (what: string, id: string): FlotillaError =>
  new FlotillaError('ALREADY_EXISTS', `${what} ${JSON.stringify(id)} already exists`);

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

export function isCode(err: unknown, code: ErrorCode): boolean {
  return err instanceof FlotillaError && err.code === code;
}
