//! The executor stack, built in one place from the enabled features. Read it top to bottom:
//! the outermost layer first, the core executor last.

use anyhow::{bail, Result};
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::executor::{BoxExecutor, CoreExecutor};
use tower::ServiceBuilder;

/// Fails when config switches on a layer this binary was built without.
pub fn check_features(cfg: &Config) -> Result<()> {
    for name in cfg.features.enabled() {
        // Each layer that exists in this build adds its line here.
        let built = name == "checkpoint" && cfg!(feature = "checkpoint");
        if !built {
            bail!(
                "features.{name} is on, but this binary was built without the `{name}` layer (cargo feature `{name}`): \
                 use a build that includes it, or set OBSERVER__FEATURES__{}=false",
                name.to_ascii_uppercase()
            );
        }
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
