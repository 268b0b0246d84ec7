// Client tokens as a customer's auth server would sign them: HS256 under a shared secret, or
// RS256 / ES256 under a private key.
import { createHmac, sign as cryptoSign } from 'node:crypto';

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');

/** Seconds since the epoch, as JWT claims count time. */
export const now = () => Math.floor(Date.now() / 1000);

/** A JWT signed with HS256 under `secret`. */
export function hs256(secret, claims) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A JWT signed with `alg` (RS256 or ES256) under `privateKey`. */
export function signed(alg, privateKey, claims) {
  const body = `${b64({ alg, typ: 'JWT' })}.${b64(claims)}`;
  const opts = alg === 'ES256' ? { key: privateKey, dsaEncoding: 'ieee-p1363' } : privateKey;
  return `${body}.${cryptoSign('sha256', Buffer.from(body), opts).toString('base64url')}`;
}
