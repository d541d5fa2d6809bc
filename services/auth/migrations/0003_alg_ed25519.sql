-- RFC 9864 deprecates the polymorphic "EdDSA" JOSE name; our Ed25519 keys say "Ed25519" now.
UPDATE signing_keys
   SET private_jwk = jsonb_set(private_jwk, '{alg}', '"Ed25519"'),
       public_jwk  = jsonb_set(public_jwk, '{alg}', '"Ed25519"')
 WHERE private_jwk ->> 'alg' = 'EdDSA' OR public_jwk ->> 'alg' = 'EdDSA';
