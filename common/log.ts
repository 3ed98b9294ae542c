import { pino, type Logger } from 'pino';

/** Daemon logs: JSON lines on stderr; FLOTILLA_LOG_LEVEL sets the level (default info). */
export function createLogger(name: string): Logger {
  return pino({ name, level: process.env.FLOTILLA_LOG_LEVEL ?? 'info' }, pino.destination(2));
}
export type { Logger };
