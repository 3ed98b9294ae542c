/** Image references: the grammar lives in common/imageref.ts (the manager validates names with it too). */
export * from '../../../common/imageref.js';
