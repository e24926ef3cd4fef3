//! `pmguard provision-aws`: the AWS side of pmguard (topic, subscription, log group, alarms,
//! dashboard), converged idempotently: observe with Describe/List calls, plan (pure), apply.

pub mod alarms;
pub mod dashboard;
pub mod fleet;
pub mod legacy_alarms;
pub mod provision;
pub mod ssm;
