import { describe, expect, it } from 'vitest';
import { imageCell } from './format.js';

const D = 'sha256:' + 'ab'.repeat(32);

describe('imageCell (the IMAGE column of service ls/ps)', () => {
  it('shows a pinned name:tag@digest as name:tag in service ls, with a short digest in service ps, whole with --no-trunc', () => {
    expect(imageCell(`busybox:latest@${D}`)).toBe('busybox:latest');
    expect(imageCell(`127.0.0.1:5000/team/app:1@${D}`)).toBe('127.0.0.1:5000/team/app:1');
    expect(imageCell(`busybox:latest@${D}`, true, 'short')).toBe('busybox:latest@sha256:abababababab');
    expect(imageCell(`busybox:latest@${D}`, false)).toBe(`busybox:latest@${D}`);
    expect(imageCell(`busybox:latest@${D}`, false, 'short')).toBe(`busybox:latest@${D}`);
  });
  it('leaves a digest-only, an unpinned and an unparsable reference as they are', () => {
    expect(imageCell(`busybox@${D}`)).toBe(`busybox@${D}`);
    expect(imageCell('busybox:1.36')).toBe('busybox:1.36');
    expect(imageCell('Not A Ref')).toBe('Not A Ref');
  });
});
