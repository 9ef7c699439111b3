//! The internal gRPC API (`shopmesh.users.v1.Users`).

use shopmesh_proto::users::v1::users_server::{Users, UsersServer};
use shopmesh_proto::users::v1::{GetUserRequest, GetUserResponse, User as UserMessage};
use time::format_description::well_known::Rfc3339;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::User;
use crate::error::Error;
use crate::store::Store;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct UsersGrpc {
    store: Store,
}

impl UsersGrpc {
    /// The tonic server for this service.
    pub fn server(store: Store) -> UsersServer<UsersGrpc> {
        UsersServer::new(UsersGrpc { store })
    }
}

fn to_message(user: User) -> UserMessage {
    UserMessage {
        id: user.id.hyphenated().to_string(),
        email: user.email.as_str().to_owned(),
        name: user.name.as_str().to_owned(),
        role: user.role.as_str().to_owned(),
        created_at: user.created_at.format(&Rfc3339).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Users for UsersGrpc {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = Uuid::parse_str(&request.get_ref().id)
            .map_err(|_| Status::invalid_argument("id must be a UUID"))?;
        let user = self.store.user(id).await?.ok_or(Error::NotFound)?;
        Ok(Response::new(GetUserResponse {
            user: Some(to_message(user)),
        }))
    }
}
