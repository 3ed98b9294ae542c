/**
 * Writes tar archives entry by entry with exact headers (absolute paths, "..", links anywhere), for tests
 * of archive handling. Paths over 100 bytes are not supported (no pax headers).
 */
import { gzipSync } from 'node:zlib';
import { Header, type HeaderData } from 'tar';

export interface RawEntry {
  path: string;
  type?: 'File' | 'Directory' | 'SymbolicLink' | 'Link' | 'CharacterDevice' | 'FIFO';
  body?: string | Buffer;
  linkpath?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  devmaj?: number;
  devmin?: number;
  mtime?: Date;
}

export function rawTar(entries: RawEntry[], opts: { gzip?: boolean } = {}): Buffer {
  const blocks: Buffer[] = [];
  for (const e of entries) {
    const body = e.body === undefined ? Buffer.alloc(0) : Buffer.from(e.body);
    const type = e.type ?? 'File';
    const data: HeaderData = {
      path: e.path,
      type,
      mode: e.mode ?? (type === 'Directory' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      size: type === 'File' ? body.length : 0,
      mtime: e.mtime ?? new Date(1_700_000_000_000),
      linkpath: e.linkpath ?? '',
      uname: '',
      gname: '',
      devmaj: e.devmaj ?? 0,
      devmin: e.devmin ?? 0,
    };
    const block = Buffer.alloc(512);
    new Header(data).encode(block, 0);
    blocks.push(block);
    if (type === 'File' && body.length > 0) {
      blocks.push(body);
      const pad = (512 - (body.length % 512)) % 512;
      if (pad) blocks.push(Buffer.alloc(pad));
    }
  }
  blocks.push(Buffer.alloc(1024));
  const out = Buffer.concat(blocks);
  return opts.gzip ? gzipSync(out) : out;
}
