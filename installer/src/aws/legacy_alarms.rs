//! The old monitor's CloudWatch alarms (`PM2-CodeBox-Service-Down`, `-High-Error-Rate`,
//! `-Frequent-Restarts`): `provision-aws` lists them beside pmguard's own and deletes them only
//! when asked (`--remove-legacy-alarms`). pmguard's own alarms all start with `pmguard-` and are
//! never matched.

use aws_sdk_cloudwatch::error::DisplayErrorContext;

/// The old set-up's alarm name endings (after its own prefix, e.g. `PM2-CodeBox`).
const SEED_SUFFIXES: &[&str] = &["-Service-Down", "-High-Error-Rate", "-Frequent-Restarts"];

#[derive(Debug, thiserror::Error)]
#[error("CloudWatch {call} failed: {detail}\n  help: the credentials need `cloudwatch:{call}`; what was deleted stays deleted and the next run resumes")]
pub struct LegacyAlarmError {
    pub call: &'static str,
    pub detail: String,
}

/// Whether `name` is one of the old monitor's alarms.
pub fn is_legacy(name: &str) -> bool {
    !name.starts_with("pmguard-") && SEED_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Every alarm in the account and region that [`is_legacy`], sorted.
pub async fn find(cw: &aws_sdk_cloudwatch::Client) -> Result<Vec<String>, LegacyAlarmError> {
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let out = cw
            .describe_alarms()
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| LegacyAlarmError {
                call: "DescribeAlarms",
                detail: DisplayErrorContext(e).to_string(),
            })?;
        names.extend(
            out.metric_alarms()
                .iter()
                .filter_map(|a| a.alarm_name())
                .filter(|n| is_legacy(n))
                .map(str::to_owned),
        );
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    names.sort();
    Ok(names)
}

/// Deletes `names` (at most 100 per DeleteAlarms call, AWS's limit).
pub async fn remove(
    cw: &aws_sdk_cloudwatch::Client,
    names: &[String],
) -> Result<(), LegacyAlarmError> {
    for chunk in names.chunks(100) {
        cw.delete_alarms()
            .set_alarm_names(Some(chunk.to_vec()))
            .send()
            .await
            .map_err(|e| LegacyAlarmError {
                call: "DeleteAlarms",
                detail: DisplayErrorContext(e).to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_monitors_alarms_match_and_pmguards_own_never_do() {
        assert!(is_legacy("PM2-CodeBox-Service-Down"));
        assert!(is_legacy("PM2-CodeBox-High-Error-Rate"));
        assert!(is_legacy("PM2-CodeBox-Frequent-Restarts"));
        assert!(!is_legacy("pmguard-i-0abc-codebox-service-down"));
        assert!(!is_legacy("pmguard-legacy-Service-Down"));
        assert!(!is_legacy("billing-alarm"));
    }
}
