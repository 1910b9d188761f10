//! Rust types generated from `proto/` (see `build.rs`): the subset of Envoy's ext_authz v3
//! API that the service speaks. Modules mirror the protobuf packages because the generated
//! code refers to other packages by relative `super::` paths.

#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod auth {
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
