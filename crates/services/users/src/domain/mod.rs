//! The users service's domain: pure types and rules, no database, HTTP or gRPC.
//!
//! Every value that enters from outside is parsed once into one of these types; a value of the
//! type is valid by construction (fields are private, the only way in is `parse`).

mod email;
mod name;
mod password;

use time::OffsetDateTime;
use uuid::Uuid;

pub use email::Email;
pub use name::UserName;
pub use password::Password;
pub use shopmesh_auth::Role;
pub use shopmesh_problem::Invalid;

/// A registered account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// UUIDv7: unique, and ordered by creation.
    pub id: Uuid,
    /// Normalised e-mail, unique.
    pub email: Email,
    /// Display name.
    pub name: UserName,
    /// Customer or admin.
    pub role: Role,
    /// When the account was created.
    pub created_at: OffsetDateTime,
}

/// What a registration carries once parsed.
#[derive(Debug)]
pub struct NewUser {
    /// The e-mail.
    pub email: Email,
    /// The display name.
    pub name: UserName,
    /// The password, not yet hashed.
    pub password: Password,
}

impl NewUser {
    /// Parses raw registration input, reporting the first field that breaks a rule.
    pub fn parse(email: &str, name: &str, password: String) -> Result<Self, Invalid> {
        let email = Email::parse(email)?;
        let name = UserName::parse(name)?;
        let password = Password::parse(password, Some(&email))?;
        Ok(NewUser {
            email,
            name,
            password,
        })
    }
}
