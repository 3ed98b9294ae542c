/**
 * The global TLS flags of this CLI invocation (--tlsdir, --tlscacert, --tlscert, --tlskey), set once by
 * main.ts before the command runs and read by client.ts when it connects to a manager. Kept apart from
 * client.ts so that the CLI's start-up does not load gRPC and the X.509 code for commands that never talk
 * to a manager (`image pull`, `image ls`, ...): that load was about half of such a command's start-up.
 */
export interface ClientTlsFlags {
  tlsdir?: string;
  tlscacert?: string;
  tlscert?: string;
  tlskey?: string;
}

let tlsFlags: ClientTlsFlags = {};

/** The TLS flags of this invocation (set once from the global options, before the command runs). */
export function setClientTlsFlags(f: ClientTlsFlags): void {
  tlsFlags = f;
}

export function clientTlsFlags(): ClientTlsFlags {
  return tlsFlags;
}
