//! The payments service's configuration: the common sections only.

shopmesh_service::service_config!(payments);
