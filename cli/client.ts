/** Connecting the CLI to a manager: --host unix:///path | HOST:PORT, or FLOTILLA_HOST. */
import * as grpc from '@grpc/grpc-js';
import { ControlClient } from '../gen/flotilla/v1/control.js';

export const DEFAULT_CONTROL_SOCKET = '/run/flotilla/control.sock';

export function hostTarget(host?: string): string {
  const h = host ?? process.env.FLOTILLA_HOST ?? `unix://${DEFAULT_CONTROL_SOCKET}`;
  if (h.startsWith('unix://')) return `unix:${h.slice('unix://'.length)}`;
  if (h.startsWith('unix:')) return h;
  if (h.startsWith('tcp://')) return h.slice('tcp://'.length);
  return h;
}

type Unary<Req, Res> = (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall;

/** A promise-returning control client. Calls fail with the server's message, or a clear "cannot reach" line. */
export class Control {
  readonly raw: ControlClient;
  constructor(readonly target: string) {
    this.raw = new ControlClient(target, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      'grpc.enable_retries': 1,
    });
  }

  call<Req, Res>(method: keyof ControlClient, req: Req, timeoutMs = 30_000): Promise<Res> {
    const fn = (this.raw[method] as unknown as Unary<Req, Res>).bind(this.raw);
    return new Promise<Res>((resolve, reject) => {
      fn(req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs, waitForReady: false } as Partial<grpc.CallOptions>, (err, res) => {
        if (err) {
          if (err.code === grpc.status.UNAVAILABLE && /connect|No connection|ECONNREFUSED|ENOENT/i.test(err.details))
            reject(new Error(`cannot reach the manager at ${this.target.replace(/^unix:/, 'unix://')} (${err.details}); is \`flotilla manager\` running? (set --host or FLOTILLA_HOST)`));
          else reject(new Error(err.details || err.message));
        } else resolve(res);
      });
    });
  }

  close(): void {
    this.raw.close();
  }
}

export async function withControl<T>(host: string | undefined, fn: (c: Control) => Promise<T>): Promise<T> {
  const c = new Control(hostTarget(host));
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}
