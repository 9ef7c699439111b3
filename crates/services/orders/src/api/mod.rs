//! The service's surface: public HTTP (through the gateway).

pub mod http;
