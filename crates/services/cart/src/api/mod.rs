//! The service's surfaces: public HTTP (through the gateway) and internal gRPC.

pub mod grpc;
pub mod http;
