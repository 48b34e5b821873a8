//! The executor stack, built in one place from the enabled features. Read it top to bottom:
//! the outermost layer first, the core executor last.

use anyhow::{bail, Result};
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::executor::{BoxExecutor, CoreExecutor};
use tower::ServiceBuilder;

/// Fails when config switches on a layer this binary was built without.
pub fn check_features(cfg: &Config) -> Result<()> {
    if cfg.features.checkpoint && !cfg!(feature = "checkpoint") {
        bail!("features.checkpoint is on, but this binary was built without the `checkpoint` cargo feature: rebuild with `--features checkpoint` or set OBSERVER__FEATURES__CHECKPOINT=false");
    }
    Ok(())
}

/// The executor every dispatch goes through.
pub fn build(_cfg: &Config, ctx: ActionContext) -> BoxExecutor {
    let stack = ServiceBuilder::new()
        // One dispatch at a time: events start in commit order. Retries wait on timers outside
        // the stack, so a failing destination never holds this slot.
        .concurrency_limit(1)
        .service(CoreExecutor::new(ctx));
    BoxExecutor::new(stack)
}
