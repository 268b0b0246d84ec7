//! The cryptography under `jsonwebtoken`: a [`CryptoProvider`] of our own, so the crate's
//! `rust_crypto` provider (a second set of RSA and elliptic-curve crates, ≈ 30 CPU-seconds of a
//! cold build) is never compiled.
//!
//! HMAC (HS256/384/512) uses the `hmac` and `sha2` crates, which the resume tokens use already.
//! Public-key tokens need the `tls` feature, whose `ring` the TLS listener compiles anyway; with it
//! the provider verifies every algorithm `ring` has: RS256/384/512, PS256/384/512 (2048–8192 bit
//! keys), ES256, ES384 and EdDSA (Ed25519). It signs only HMAC: a node never issues asymmetric
//! tokens, it only checks the ones the customer's servers sign.

use hmac::{Hmac, Mac};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
#[cfg(feature = "tls")]
use ring::signature as sig;
use sha2::{Sha256, Sha384, Sha512};

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes this provider the process's. Idempotent; every path into `jsonwebtoken` calls it first.
pub fn install() {
    // Err only when a provider is installed already, which is this one.
    let _ = PROVIDER.install_default();
}

/// An HMAC key of one of the three JWT hashes.
#[derive(Clone)]
enum HmacKey {
    S256(Hmac<Sha256>),
    S384(Hmac<Sha384>),
    S512(Hmac<Sha512>),
}

impl HmacKey {
    /// `None` when `alg` is not an HMAC algorithm.
    fn new(alg: Algorithm, secret: &[u8]) -> Option<Self> {
        // HMAC takes a key of any length: `new_from_slice` cannot fail.
        Some(match alg {
            Algorithm::HS256 => Self::S256(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS384 => Self::S384(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS512 => Self::S512(Hmac::new_from_slice(secret).ok()?),
            _ => return None,
        })
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self.clone() {
            Self::S256(m) => m.chain_update(msg).finalize().into_bytes().to_vec(),
            Self::S384(m) => m.chain_update(msg).finalize().into_bytes().to_vec(),
            Self::S512(m) => m.chain_update(msg).finalize().into_bytes().to_vec(),
        }
    }

    /// In constant time.
    fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        match self.clone() {
            Self::S256(m) => m.chain_update(msg).verify_slice(tag).is_ok(),
            Self::S384(m) => m.chain_update(msg).verify_slice(tag).is_ok(),
            Self::S512(m) => m.chain_update(msg).verify_slice(tag).is_ok(),
        }
    }
}

#[cfg(feature = "tls")]
fn rsa_alg(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// The family a key must have for an algorithm (so an RSA public key is never used as an HMAC
/// secret: the classic algorithm-confusion attack).
fn family(alg: Algorithm) -> AlgorithmFamily {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => AlgorithmFamily::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => AlgorithmFamily::Ec,
        Algorithm::EdDSA => AlgorithmFamily::Ed,
        _ => AlgorithmFamily::Rsa,
    }
}

struct HmacSigner(Algorithm, HmacKey);

impl signature::Signer<Vec<u8>> for HmacSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(self.1.sign(msg))
    }
}

impl JwtSigner for HmacSigner {
    fn algorithm(&self) -> Algorithm {
        self.0
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    // The algorithm is checked before the key's family.
    let k = HmacKey::new(*alg, key.as_bytes()).ok_or(ErrorKind::InvalidAlgorithm)?;
    if key.family() != AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(HmacSigner(*alg, k)))
}

enum Check {
    /// Boxed: the hash states are several times the size of the other variants.
    Hmac(Box<HmacKey>),
    /// A public key in the form `ring` reads: PKCS#1 DER for RSA, the uncompressed point for
    /// ECDSA, the 32 bytes for Ed25519 (what `jsonwebtoken` keeps after reading a PEM).
    #[cfg(feature = "tls")]
    Public(&'static dyn sig::VerificationAlgorithm, Vec<u8>),
    #[cfg(feature = "tls")]
    Rsa(&'static sig::RsaParameters, Vec<u8>, Vec<u8>),
}

struct Verifier(Algorithm, Check);

impl signature::Verifier<Vec<u8>> for Verifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let ok = match &self.1 {
            Check::Hmac(k) => k.verify(msg, signature),
            #[cfg(feature = "tls")]
            Check::Public(alg, key) => sig::UnparsedPublicKey::new(*alg, key)
                .verify(msg, signature)
                .is_ok(),
            #[cfg(feature = "tls")]
            Check::Rsa(alg, n, e) => sig::RsaPublicKeyComponents { n, e }
                .verify(alg, msg, signature)
                .is_ok(),
        };
        ok.then_some(()).ok_or_else(signature::Error::new)
    }
}

impl JwtVerifier for Verifier {
    fn algorithm(&self) -> Algorithm {
        self.0
    }
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let alg = *alg;
    if key.family() != family(alg) {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let check = match (key.kind(), alg) {
        (DecodingKeyKind::SecretOrDer(bytes), a) if family(a) == AlgorithmFamily::Hmac => {
            Check::Hmac(Box::new(
                HmacKey::new(a, bytes).ok_or(ErrorKind::InvalidAlgorithm)?,
            ))
        }
        #[cfg(feature = "tls")]
        (DecodingKeyKind::SecretOrDer(bytes), Algorithm::ES256) => {
            Check::Public(&sig::ECDSA_P256_SHA256_FIXED, bytes.clone())
        }
        #[cfg(feature = "tls")]
        (DecodingKeyKind::SecretOrDer(bytes), Algorithm::ES384) => {
            Check::Public(&sig::ECDSA_P384_SHA384_FIXED, bytes.clone())
        }
        #[cfg(feature = "tls")]
        (DecodingKeyKind::SecretOrDer(bytes), Algorithm::EdDSA) => {
            Check::Public(&sig::ED25519, bytes.clone())
        }
        #[cfg(feature = "tls")]
        (DecodingKeyKind::SecretOrDer(bytes), a) => Check::Public(
            rsa_alg(a).ok_or(ErrorKind::InvalidAlgorithm)?,
            bytes.clone(),
        ),
        #[cfg(feature = "tls")]
        (DecodingKeyKind::RsaModulusExponent { n, e }, a) => Check::Rsa(
            rsa_alg(a).ok_or(ErrorKind::InvalidAlgorithm)?,
            n.clone(),
            e.clone(),
        ),
        // Public keys need `ring` (the `tls` feature); `Credentials::new` says so at startup.
        #[cfg(not(feature = "tls"))]
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(Box::new(Verifier(alg, check)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Header, Validation, decode, encode};
    #[cfg(feature = "tls")]
    use ring::{rand::SystemRandom, signature::KeyPair};

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct C {
        sub: String,
        exp: u64,
    }

    fn claims() -> C {
        C {
            sub: "u".into(),
            exp: crate::clock::now_ms() / 1000 + 60,
        }
    }

    fn b64(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    #[cfg(feature = "tls")]
    fn p256() -> sig::EcdsaKeyPair {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()
    }

    #[cfg(feature = "tls")]
    /// A token signed outside `jsonwebtoken` (ring's ECDSA signer), as a customer's server would.
    fn es256_token(pair: &sig::EcdsaKeyPair, header_alg: &str) -> String {
        let head = b64(format!(r#"{{"alg":"{header_alg}","typ":"JWT"}}"#).as_bytes());
        let body = b64(&serde_json::to_vec(&claims()).unwrap());
        let msg = format!("{head}.{body}");
        let s = pair.sign(&SystemRandom::new(), msg.as_bytes()).unwrap();
        format!("{msg}.{}", b64(s.as_ref()))
    }

    #[test]
    fn hmac_signs_and_verifies_and_refuses_another_secret() {
        install();
        for (alg, len) in [
            (Algorithm::HS256, 32_usize),
            (Algorithm::HS384, 48),
            (Algorithm::HS512, 64),
        ] {
            let t = encode(
                &Header::new(alg),
                &claims(),
                &EncodingKey::from_secret(b"one"),
            )
            .unwrap();
            let tag = t.rsplit('.').next().unwrap();
            assert_eq!(tag.len(), (len * 4).div_ceil(3), "{alg:?}");
            let v = Validation::new(alg);
            let one = DecodingKey::from_secret(b"one");
            assert_eq!(decode::<C>(&t, &one, &v).unwrap().claims.sub, "u");
            let e = decode::<C>(&t, &DecodingKey::from_secret(b"two"), &v).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::InvalidSignature);
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn es256_verifies_a_good_signature_and_refuses_a_tampered_one() {
        install();
        let pair = p256();
        let key = DecodingKey::from_ec_der(pair.public_key().as_ref());
        let v = Validation::new(Algorithm::ES256);
        let good = es256_token(&pair, "ES256");
        assert_eq!(decode::<C>(&good, &key, &v).unwrap().claims, claims());
        // Another payload under the same signature.
        let (msg, s) = good.rsplit_once('.').unwrap();
        let (head, _) = msg.split_once('.').unwrap();
        let forged = format!(
            "{head}.{}.{s}",
            b64(br#"{"sub":"admin","exp":99999999999}"#)
        );
        let e = decode::<C>(&forged, &key, &v).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidSignature);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_public_key_is_never_an_hmac_secret() {
        install();
        let pair = p256();
        let public = pair.public_key().as_ref().to_vec();
        // The attacker signs HS256 with the (public) key bytes as the secret.
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        let key = DecodingKey::from_ec_der(&public);
        let mut v = Validation::new(Algorithm::ES256);
        assert!(decode::<C>(&t, &key, &v).is_err());
        // Even when the validation were to allow HS256, the EC key is not an HMAC key.
        v.algorithms = vec![Algorithm::HS256];
        assert!(decode::<C>(&t, &key, &v).is_err());
    }

    #[test]
    fn only_hmac_is_signed() {
        install();
        let e = encode(
            &Header::new(Algorithm::ES256),
            &claims(),
            &EncodingKey::from_ec_der(b"not a key"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidAlgorithm);
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_tls_public_key_tokens_are_refused_not_trusted() {
        install();
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        // The same token claimed as ES256, against an EC key: no check exists, so no pass.
        let (_, rest) = t.split_once('.').unwrap();
        let es = format!("{}.{rest}", b64(br#"{"alg":"ES256"}"#));
        let e = decode::<C>(
            &es,
            &DecodingKey::from_ec_der(b"k"),
            &Validation::new(Algorithm::ES256),
        )
        .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidAlgorithm);
    }
}
