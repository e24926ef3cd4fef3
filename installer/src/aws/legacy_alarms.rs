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

/// Whether an alarm is one of the old monitor's: the seed's naming (`PM2-<App>-Service-Down`,
/// `-High-Error-Rate`, `-Frequent-Restarts`) on a metric in the seed's kind of namespace
/// (`PM2/<App>`). Another team's `Payments-API-Service-Down` is never matched: this list is
/// deleted with one flag.
pub fn is_legacy(name: &str, namespace: Option<&str>) -> bool {
    name.starts_with("PM2-")
        && SEED_SUFFIXES.iter().any(|s| name.ends_with(s))
        && namespace.is_some_and(|n| n.starts_with("PM2/"))
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
                .filter(|a| a.alarm_name().is_some_and(|n| is_legacy(n, a.namespace())))
                .filter_map(|a| a.alarm_name())
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
        let seed = Some("PM2/CodeBox");
        assert!(is_legacy("PM2-CodeBox-Service-Down", seed));
        assert!(is_legacy("PM2-CodeBox-High-Error-Rate", seed));
        assert!(is_legacy("PM2-CodeBox-Frequent-Restarts", seed));
        assert!(!is_legacy("pmguard-i-0abc-codebox-service-down", seed));
        assert!(!is_legacy("pmguard-legacy-Service-Down", seed));
        assert!(!is_legacy("billing-alarm", seed));
        // Other teams' alarms with the same endings are never the old monitor's.
        assert!(!is_legacy("Payments-API-Service-Down", Some("Payments")));
        assert!(!is_legacy("Checkout-High-Error-Rate", seed));
        assert!(!is_legacy("PM2-Other-Service-Down", Some("AWS/EC2")));
    }
}
