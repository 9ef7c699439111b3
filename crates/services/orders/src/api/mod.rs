//! The service's surfaces: public HTTP (through the gateway) and internal gRPC (audit).

pub mod grpc;
pub mod http;
