/**
 * Connecting the CLI to a manager: --host unix:///path | HOST:PORT, or FLOTILLA_HOST.
 * Over the unix socket (0600, root) no certificate is needed; over TCP the CLI presents an admin
 * client certificate (`flotilla cluster client-cert --out DIR` on a manager) given by
 * --tlsdir DIR (ca.pem, cert.pem, key.pem) or --tlscacert/--tlscert/--tlskey, or the environment
 * variables FLOTILLA_TLS_DIR, FLOTILLA_TLS_CACERT, FLOTILLA_TLS_CERT, FLOTILLA_TLS_KEY.
 */
import * as grpc from '@grpc/grpc-js';
import { ControlClient } from '../gen/flotilla/v1/control.js';
import { readClientTls } from '../manager/ca/certstore.js';
import { TLS_CHANNEL_OPTIONS, staticClientCredentials } from '../manager/ca/credentials.js';
import { clientTlsFlags } from './tlsflags.js';

export const DEFAULT_CONTROL_SOCKET = '/run/flotilla/control.sock';

export function hostTarget(host?: string): string {
  const h = host ?? process.env.FLOTILLA_HOST ?? `unix://${DEFAULT_CONTROL_SOCKET}`;
  if (h.startsWith('unix://')) return `unix:${h.slice('unix://'.length)}`;
  if (h.startsWith('unix:')) return h;
  if (h.startsWith('tcp://')) return h.slice('tcp://'.length);
  return h;
}

export { type ClientTlsFlags, setClientTlsFlags } from './tlsflags.js';

/** Credentials for a target: none over the unix socket, the admin client certificate over TCP. */
export function credentialsFor(target: string): { creds: grpc.ChannelCredentials; options: grpc.ChannelOptions } {
  if (target.startsWith('unix:')) return { creds: grpc.credentials.createInsecure(), options: {} };
  const env = process.env;
  const tlsFlags = clientTlsFlags();
  const dir = tlsFlags.tlsdir ?? env.FLOTILLA_TLS_DIR;
  const ca = tlsFlags.tlscacert ?? env.FLOTILLA_TLS_CACERT;
  const cert = tlsFlags.tlscert ?? env.FLOTILLA_TLS_CERT;
  const key = tlsFlags.tlskey ?? env.FLOTILLA_TLS_KEY;
  if (!dir && !ca && !cert && !key) {
    throw new Error(
      `the manager at ${target} needs a client certificate over TCP: pass --tlsdir DIR (or FLOTILLA_TLS_DIR) with ca.pem, cert.pem, key.pem from \`flotilla cluster client-cert --out DIR\` on a manager, or use the local unix socket`,
    );
  }
  return { creds: staticClientCredentials(readClientTls({ dir, ca, cert, key })), options: TLS_CHANNEL_OPTIONS };
}

type Unary<Req, Res> = (req: Req, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall;

/** A promise-returning control client. Calls fail with the server's message, or a clear "cannot reach" line. */
export class Control {
  readonly raw: ControlClient;
  constructor(readonly target: string) {
    const { creds, options } = credentialsFor(target);
    this.raw = new ControlClient(target, creds, {
      ...options,
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
