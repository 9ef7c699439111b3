//! Layered configuration for every shopmesh process.
//!
//! # Layers, lowest first
//! 1. defaults in code (`#[serde(default)]` on each settings struct);
//! 2. an optional TOML file (`SHOPMESH_CONFIG=path`, or [`Sources::file`]);
//! 3. a `.env` file in the working directory, read without touching the process environment;
//! 4. `SHOPMESH_<SECTION>__<KEY>` environment variables (`SHOPMESH_SERVER__PORT=8081`,
//!    `SHOPMESH_DATA_DIR=/var/lib/shopmesh`).
//!
//! The environment is passed in as a map ([`Sources::env`]), so tests never call `set_var`.
//! Settings structs use `#[serde(deny_unknown_fields)]`: an unknown key or a bad value fails at
//! start-up with a message that names the key as the user wrote it (`SHOPMESH_SERVER__PORT`, or
//! `server.port` in the file) and what was expected.
//!
//! One file or environment may configure several processes (the local launcher passes one
//! environment to all). Each process owns the common sections plus its own; the sections of the
//! other processes ([`PROCESS_SECTIONS`]) are set aside, not reported as unknown, and so are
//! the common sections ([`COMMON_SECTIONS`]) that this process's settings do not declare.
//!
//! The settings sections themselves live with the code that uses them (`shopmesh-runtime` owns
//! `server` and `log`, `shopmesh-db` owns `database`, ...). This crate is only the loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

/// Prefix of every environment variable shopmesh reads.
pub const ENV_PREFIX: &str = "SHOPMESH_";
/// Environment variable that names the optional TOML file.
pub const CONFIG_FILE_VAR: &str = "SHOPMESH_CONFIG";

/// Top-level sections that belong to one process each. A process ignores the others' sections.
pub const PROCESS_SECTIONS: &[&str] = &[
    "gateway",
    "users",
    "catalog",
    "inventory",
    "orders",
    "payments",
    "cart",
    "notifications",
    "storefront",
    "launcher",
];

/// Top-level sections every process may be given, because one environment serves them all
/// (`shopmesh up` passes its environment to every process): a process that does not use one
/// of these sets it aside, as it does the other processes' sections, instead of refusing it.
/// (`SHOPMESH_DATABASE__MAX_CONNECTIONS=1` for the whole shop must not stop the gateway, which
/// has no database.) Any other unknown top-level key is still refused.
pub const COMMON_SECTIONS: &[&str] = &[
    "data_dir", "server", "log", "database", "auth", "mesh", "events",
];

/// `data_dir`: where a process keeps its files (SQLite databases, the launcher's state);
/// `./data` unless configured. Shared by every process, so it lives with the loader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct DataDir(pub PathBuf);

impl Default for DataDir {
    fn default() -> Self {
        DataDir(PathBuf::from("./data"))
    }
}

impl std::ops::Deref for DataDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

/// Where configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    file: Option<PathBuf>,
    dotenv: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

impl Sources {
    /// No file, no `.env`, empty environment: defaults only. Tests start here.
    pub fn empty() -> Self {
        Self::default()
    }

    /// What a real process uses: its environment, `./.env` if present, and the file named by
    /// `SHOPMESH_CONFIG`.
    pub fn from_process() -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let file = env.get(CONFIG_FILE_VAR).map(PathBuf::from);
        Sources {
            file,
            dotenv: Some(PathBuf::from(".env")),
            env,
        }
    }

    /// Reads this TOML file (it must exist).
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Reads this `.env` file when it exists.
    pub fn dotenv(mut self, path: impl Into<PathBuf>) -> Self {
        self.dotenv = Some(path.into());
        self
    }

    /// Uses this map as the environment (only `SHOPMESH_*` keys are read).
    pub fn env<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Adds or replaces one environment variable.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// The environment map.
    pub fn env_map(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// Loads the settings of the process that owns `own_section` (e.g. `"users"`); `None` for a
    /// process that owns no section of its own.
    pub fn load<T: DeserializeOwned>(&self, own_section: Option<&str>) -> Result<T, ConfigError> {
        let declared = declared_fields::<T>();
        let ignore: Vec<String> = PROCESS_SECTIONS
            .iter()
            .filter(|s| Some(**s) != own_section)
            .chain(
                COMMON_SECTIONS
                    .iter()
                    .filter(|s| declared.is_some_and(|fields| !fields.contains(s))),
            )
            .map(|s| (*s).to_owned())
            .collect();

        let mut figment = Figment::new();
        if let Some(path) = &self.file {
            if !path.is_file() {
                return Err(ConfigError::FileMissing(path.clone()));
            }
            figment = figment.merge(Filtered {
                inner: Toml::file(path),
                ignore: ignore.clone(),
            });
        }
        if let Some(path) = &self.dotenv
            && path.is_file()
        {
            let vars = read_dotenv(path)?;
            figment = figment.merge(Filtered {
                inner: EnvVars::new(format!("{} file", path.display()), &vars)?,
                ignore: ignore.clone(),
            });
        }
        figment = figment.merge(Filtered {
            inner: EnvVars::new("environment".to_owned(), &self.env)?,
            ignore,
        });
        figment
            .extract_lossy()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))
    }
}

/// The field names of the settings struct `T`, as its `Deserialize` implementation declares
/// them (`None` if `T` is not deserialized as a struct). Serde has no reflection: this asks `T`
/// to deserialize itself from a deserializer that only records the fields it is offered.
fn declared_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{self, Visitor};

    struct Fields(Option<&'static [&'static str]>);

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("fields recorded")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for &mut Fields {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields = Fields(None);
    let _ = T::deserialize(&mut fields);
    fields.0
}

fn read_dotenv(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| ConfigError::DotEnv {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    iter.map(|item| {
        item.map_err(|e| ConfigError::DotEnv {
            path: path.to_owned(),
            message: e.to_string(),
        })
    })
    .collect()
}

/// Why configuration could not be loaded. The message names the key and the expected form.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `SHOPMESH_CONFIG` names a file that is not there.
    #[error("configuration file {0} does not exist (set by SHOPMESH_CONFIG)")]
    FileMissing(PathBuf),
    /// The `.env` file could not be parsed.
    #[error("cannot read {path}: {message}")]
    DotEnv {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An environment variable's name does not map to a key.
    #[error("environment variable {name} is malformed: {reason}")]
    BadVariable {
        /// The variable.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key is unknown or a value has the wrong form.
    #[error("invalid configuration: {}", describe(.0))]
    Invalid(Box<figment::Error>),
}

fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `SHOPMESH_*` variables from a map, as nested keys (`SERVER__PORT` is `server.port`).
struct EnvVars {
    name: String,
    dict: Dict,
}

impl EnvVars {
    fn new(name: String, vars: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut dict = Dict::new();
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if key == CONFIG_FILE_VAR {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::BadVariable {
                    name: key.clone(),
                    reason: "expected SHOPMESH_<SECTION>__<KEY> with no empty part",
                });
            }
            insert(&mut dict, &path, Value::from(value.clone())).map_err(|reason| {
                ConfigError::BadVariable {
                    name: key.clone(),
                    reason,
                }
            })?;
        }
        Ok(EnvVars { name, dict })
    }
}

fn insert(dict: &mut Dict, path: &[String], value: Value) -> Result<(), &'static str> {
    match path {
        [] => Ok(()),
        [last] => {
            if dict.contains_key(last) {
                return Err("it is both a value and a section");
            }
            dict.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            match entry {
                Value::Dict(_, inner) => insert(inner, rest, value),
                _ => Err("it is both a value and a section"),
            }
        }
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone()).interpolater(|_: &Profile, keys: &[&str]| {
            let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{ENV_PREFIX}{}", keys.join("__"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.dict.clone())]))
    }
}

/// A provider with the sections of other processes removed.
struct Filtered<P> {
    inner: P,
    ignore: Vec<String>,
}

impl<P: Provider> Provider for Filtered<P> {
    fn metadata(&self) -> Metadata {
        self.inner.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut data = self.inner.data()?;
        for dict in data.values_mut() {
            dict.retain(|key, _| !self.ignore.contains(key));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        data_dir: String,
        server: Server,
        users: Users,
    }

    impl Default for Settings {
        fn default() -> Self {
            Settings {
                data_dir: "./data".into(),
                server: Server::default(),
                users: Users::default(),
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Server {
        host: String,
        port: u16,
        verbose: bool,
    }

    impl Default for Server {
        fn default() -> Self {
            Server {
                host: "127.0.0.1".into(),
                port: 8080,
                verbose: false,
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Users {
        token_ttl_secs: u64,
    }

    fn load(sources: Sources) -> Result<Settings, ConfigError> {
        sources.load(Some("users"))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        assert_eq!(load(Sources::empty()).expect("load"), Settings::default());
    }

    #[test]
    fn environment_overrides_dotenv_which_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("shopmesh.toml");
        std::fs::write(
            &file,
            "data_dir = \"/file\"\n[server]\nport = 1\nhost = \"10.0.0.1\"\n",
        )
        .expect("write");
        let dotenv = dir.path().join(".env");
        std::fs::write(
            &dotenv,
            "SHOPMESH_SERVER__PORT=2\nSHOPMESH_DATA_DIR=/dotenv\n",
        )
        .expect("write");
        let settings = load(Sources::empty().file(&file).dotenv(&dotenv).env([
            ("SHOPMESH_SERVER__PORT", "3"),
            ("SHOPMESH_SERVER__VERBOSE", "true"),
        ]))
        .expect("load");
        assert_eq!(settings.server.port, 3);
        assert!(settings.server.verbose);
        assert_eq!(settings.server.host, "10.0.0.1");
        assert_eq!(settings.data_dir, "/dotenv");
    }

    #[test]
    fn an_unknown_key_fails_and_names_the_variable() {
        let err =
            load(Sources::empty().env([("SHOPMESH_SERVER__PROT", "3")])).expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("prot"), "{message}");
    }

    #[test]
    fn a_malformed_value_fails_and_names_the_variable() {
        let err = load(Sources::empty().env([("SHOPMESH_SERVER__PORT", "eighty")]))
            .expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("SHOPMESH_SERVER__PORT"), "{message}");
        assert!(message.contains("u16"), "{message}");
    }

    #[test]
    fn another_process_section_is_set_aside_but_a_typo_section_is_not() {
        let ok = load(Sources::empty().env([("SHOPMESH_GATEWAY__BODY_LIMIT", "5")]));
        assert!(ok.is_ok(), "{ok:?}");
        let own =
            load(Sources::empty().env([("SHOPMESH_USERS__TOKEN_TTL_SECS", "60")])).expect("load");
        assert_eq!(own.users.token_ttl_secs, 60);
        let typo = load(Sources::empty().env([("SHOPMESH_SERVR__PORT", "5")]));
        assert!(typo.is_err());
    }

    #[test]
    fn a_common_section_this_process_does_not_use_is_set_aside_but_a_typo_is_not() {
        // `Settings` has no `database`, `mesh` nor `events`, as the gateway has no database.
        let ok = load(Sources::empty().env([
            ("SHOPMESH_DATABASE__MAX_CONNECTIONS", "1"),
            ("SHOPMESH_MESH__BALANCE", "round_robin"),
            ("SHOPMESH_EVENTS__PREFETCH", "8"),
        ]));
        assert!(ok.is_ok(), "{ok:?}");
        let typo = load(Sources::empty().env([("SHOPMESH_DATABSE__MAX_CONNECTIONS", "1")]));
        assert!(typo.is_err(), "{typo:?}");
        // A common section the process does use is still checked key by key.
        let inner = load(Sources::empty().env([("SHOPMESH_SERVER__PROT", "1")]));
        assert!(inner.is_err(), "{inner:?}");
    }

    #[test]
    fn the_declared_fields_of_a_settings_struct_are_found() {
        assert_eq!(
            declared_fields::<Settings>(),
            Some(&["data_dir", "server", "users"][..])
        );
        assert_eq!(declared_fields::<BTreeMap<String, String>>(), None);
    }

    #[test]
    fn variables_without_the_prefix_are_ignored() {
        let settings =
            load(Sources::empty().env([("PATH", "/bin"), ("SERVER__PORT", "1")])).expect("load");
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = load(Sources::empty().file("/nonexistent/shopmesh.toml")).expect_err("fail");
        assert!(matches!(err, ConfigError::FileMissing(_)));
    }

    #[test]
    fn a_variable_that_is_both_value_and_section_is_rejected() {
        let err =
            load(Sources::empty().env([("SHOPMESH_SERVER", "1"), ("SHOPMESH_SERVER__PORT", "2")]))
                .expect_err("fail");
        assert!(matches!(err, ConfigError::BadVariable { .. }), "{err}");
    }
}
