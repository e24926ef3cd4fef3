//! A fleet's config in SSM Parameter Store: `pmguard fleet push-config` stores the validated file
//! (admin side), `pmguard install --config ssm:NAME` reads it on a box.
//!
//! Invariants: only a config that validates is ever stored; an unchanged config makes no
//! mutating call (GetParameter first, PutParameter only on a difference), so a re-run is
//! "Nothing to do."; the parameter is a plain `String` (a pmguard config holds no credentials),
//! in the Standard tier up to 4 KB and the Advanced tier up to 8 KB (AWS's limits).

use super::provision::{explain, AwsError, Clients};
use crate::Error;

/// Standard-tier parameter values are at most 4 KB; Advanced-tier at most 8 KB.
pub const STANDARD_MAX_BYTES: usize = 4096;
pub const ADVANCED_MAX_BYTES: usize = 8192;

/// The prefix of a config argument that names a parameter instead of a file.
pub const SCHEME: &str = "ssm:";

/// Checks a parameter name against Parameter Store's rules (pure).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b));
    if name.is_empty() || name.len() > 1011 || !ok_chars {
        return Err(Error::ParameterNameChars {
            name: name.to_string(),
        });
    }
    if name.contains('/') && !name.starts_with('/') {
        return Err(Error::ParameterNameHierarchy {
            name: name.to_string(),
        });
    }
    let lower = name.trim_start_matches('/').to_ascii_lowercase();
    if lower.starts_with("aws") || lower.starts_with("ssm") {
        return Err(Error::ParameterNameReserved {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// The tier a value needs, or why it cannot be stored.
pub fn tier(value: &str) -> Result<aws_sdk_ssm::types::ParameterTier, Error> {
    use aws_sdk_ssm::types::ParameterTier;
    match value.len() {
        n if n <= STANDARD_MAX_BYTES => Ok(ParameterTier::Standard),
        n if n <= ADVANCED_MAX_BYTES => Ok(ParameterTier::Advanced),
        bytes => Err(Error::ParameterTooLarge {
            bytes,
            max: ADVANCED_MAX_BYTES,
        }),
    }
}

/// The parameter's current value, `None` when it does not exist.
pub async fn get(c: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match c.ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(None)
        }
        Err(e) => Err(explain("GetParameter", "ssm:GetParameter", e)),
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Unchanged,
    Created,
    Updated,
}

/// Stores `value` under `name` unless it is already there; returns what it did.
pub async fn push(c: &Clients, name: &str, value: &str) -> Result<Pushed, AwsError> {
    let old = get(c, name).await?;
    if old.as_deref() == Some(value) {
        return Ok(Pushed::Unchanged);
    }
    let tier = tier(value).map_err(|e| AwsError {
        call: "PutParameter",
        detail: e.to_string(),
        fix: "shorten the config (comments included) or split the fleet".into(),
    })?;
    c.ssm
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .tier(tier)
        .overwrite(true)
        .description("pmguard config. Managed by pmguard fleet push-config.")
        .send()
        .await
        .map_err(|e| explain("PutParameter", "ssm:PutParameter", e))?;
    Ok(if old.is_some() {
        Pushed::Updated
    } else {
        Pushed::Created
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_names_follow_parameter_store_rules() {
        check_name("/pmguard/web/config").unwrap();
        check_name("pmguard-web").unwrap();
        assert!(check_name("").is_err());
        assert!(check_name("pmguard/web")
            .unwrap_err()
            .to_string()
            .contains("starts with /"));
        assert!(check_name("/aws/x")
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        assert!(check_name("/a b").is_err());
        assert!(check_name(&format!("/{}", "x".repeat(1011))).is_err());
    }

    #[test]
    fn a_config_past_4_kb_needs_the_advanced_tier_and_past_8_kb_cannot_be_stored() {
        use aws_sdk_ssm::types::ParameterTier;
        assert_eq!(tier(&"x".repeat(4096)).unwrap(), ParameterTier::Standard);
        assert_eq!(tier(&"x".repeat(4097)).unwrap(), ParameterTier::Advanced);
        assert!(tier(&"x".repeat(8193))
            .unwrap_err()
            .to_string()
            .contains("8192"));
    }
}
