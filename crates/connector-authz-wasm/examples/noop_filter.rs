//! The do-nothing proxy-wasm filter of `benches/load.sh` (configuration WN): the baseline
//! that says what connector-authz's filter costs Envoy beyond the cost of running any
//! Rust filter in V8. Per request it reads three headers, looks the bearer token up in a
//! per-VM set, and sets one header; it never denies.
//!
//!   cargo build --release --target wasm32-wasip1 -p connector-authz-wasm --example noop_filter
//!
//! Natively (where `cargo test --all-targets` builds every example) it is empty: the host
//! calls of proxy-wasm exist only inside a Wasm VM.

#[cfg(target_family = "wasm")]
mod filter {
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::rc::Rc;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    /// Tokens the set remembers (a bound, as any real filter would have).
    const SEEN_MAX: usize = 10_000;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
    }}

    #[derive(Default)]
    struct Root {
        seen: Rc<RefCell<HashSet<String>>>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop {
                seen: Rc::clone(&self.seen),
            }))
        }
    }

    struct Noop {
        seen: Rc<RefCell<HashSet<String>>>,
    }

    impl Context for Noop {}

    impl HttpContext for Noop {
        fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
            let token = self
                .get_http_request_header("authorization")
                .unwrap_or_default();
            let realm = self.get_http_request_header("x-gitlab-realm");
            let instance = self.get_http_request_header("x-gitlab-instance-id");
            let known = {
                let mut seen = self.seen.borrow_mut();
                let known = seen.contains(&token);
                if !known && seen.len() < SEEN_MAX {
                    seen.insert(token);
                }
                known
            };
            let value = if known && realm.is_some() && instance.is_some() {
                "known"
            } else {
                "new"
            };
            self.set_http_request_header("x-noop-filter", Some(value));
            Action::Continue
        }
    }
}
