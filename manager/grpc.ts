import * as grpc from '@grpc/grpc-js';
import { FlotillaError, errorMessage } from '../common/errors.js';

const CODES: Record<string, grpc.status> = {
  INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  NOT_FOUND: grpc.status.NOT_FOUND,
  ALREADY_EXISTS: grpc.status.ALREADY_EXISTS,
  FAILED_PRECONDITION: grpc.status.FAILED_PRECONDITION,
  PERMISSION_DENIED: grpc.status.PERMISSION_DENIED,
  UNAVAILABLE: grpc.status.UNAVAILABLE,
  RESOURCE_EXHAUSTED: grpc.status.RESOURCE_EXHAUSTED,
  ABORTED: grpc.status.ABORTED,
  DEADLINE_EXCEEDED: grpc.status.DEADLINE_EXCEEDED,
  OUT_OF_RANGE: grpc.status.OUT_OF_RANGE,
  INTERNAL: grpc.status.INTERNAL,
};

/** Turns any error into a gRPC status error with a readable message. */
export function grpcError(err: unknown): Partial<grpc.StatusObject> & Error {
  const code = err instanceof FlotillaError ? (CODES[err.code] ?? grpc.status.UNKNOWN) : grpc.status.INTERNAL;
  const e = new Error(errorMessage(err)) as Error & Partial<grpc.StatusObject>;
  e.code = code;
  e.details = errorMessage(err);
  return e;
}
