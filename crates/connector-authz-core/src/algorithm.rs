//! Which JWS algorithms a token or a published key may use: one parser for both, so a
//! token header and a JWKS `alg` are judged by the same words.

use jsonwebtoken::Algorithm;

/// Signing algorithms a service token may use: asymmetric only. `none` and the HMAC
/// family are refused outright, since an HMAC "key" would be the issuer's public key.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        n if n.eq_ignore_ascii_case("none") || n.to_ascii_uppercase().starts_with("HS") => {
            return Err(format!(
                "{n:?} is never accepted: only asymmetric signatures (RS256, PS256, ES256, ...) prove who signed"
            ));
        }
        n => {
            return Err(format!(
                "{n:?} is not a JWS algorithm this service knows; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
            ));
        }
    };
    Ok(alg)
}
