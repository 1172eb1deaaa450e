//! Reading the TOML file into [`Options`]. The keys of one listener
//! ([`ListenerSettings`]) sit at the top level and in each `[[listeners]]`
//! entry beside the other keys; each table is split by key and each part
//! read on its own, so an error still names its key (`listeners[1].upstream`),
//! which serde's `flatten` would lose.

use std::path::Path;

use serde::{
    Deserialize,
    de::{self, Deserializer, Visitor},
};
use toml::{Table, Value};

use super::{ConfigError, ListenerOptions, ListenerSettings, Options};

pub(super) fn read(path: &Path) -> Result<Options, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(&text, path)
}

/// The text of the file at `path`, read.
pub(super) fn parse(text: &str, path: &Path) -> Result<Options, ConfigError> {
    let parse_error =
        |field: String, message: String| ConfigError::Parse { path: path.into(), field, message };
    let mut top: Table = text
        .parse()
        .map_err(|e: toml::de::Error| parse_error("(top level)".into(), e.message().trim().to_owned()))?;
    let entries = top.remove("listeners");
    let (settings, rest) = split(top);
    let mut options: Options = read_table(rest, "").map_err(|(f, m)| parse_error(f, m))?;
    options.listener = read_table(settings, "").map_err(|(f, m)| parse_error(f, m))?;
    let entries = match entries {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            let message = format!("expected an array of tables ([[listeners]]), found {}", other.type_str());
            return Err(parse_error("listeners".into(), message));
        }
    };
    for (index, entry) in entries.into_iter().enumerate() {
        let at = format!("listeners[{index}]");
        let Value::Table(entry) = entry else {
            return Err(parse_error(at, "expected a table".into()));
        };
        let (settings, rest) = split(entry);
        let mut listener: ListenerOptions = read_table(rest, &at).map_err(|(f, m)| parse_error(f, m))?;
        listener.settings = read_table(settings, &at).map_err(|(f, m)| parse_error(f, m))?;
        options.listeners.push(listener);
    }
    Ok(options)
}

/// The keys of [`ListenerSettings`], and the others.
fn split(table: Table) -> (Table, Table) {
    let keys = keys_of::<ListenerSettings>();
    table.into_iter().partition(|(key, _)| keys.contains(&key.as_str()))
}

/// `table` read as a `T`; an error gives the key's path under `at` and the message.
fn read_table<T: for<'de> Deserialize<'de>>(table: Table, at: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(Value::Table(table)).map_err(|err| {
        let inner = err.path().to_string();
        let field = match (at, inner.as_str()) {
            ("", ".") => "(top level)".to_owned(),
            ("", inner) => inner.to_owned(),
            (at, ".") => at.to_owned(),
            (at, inner) => format!("{at}.{inner}"),
        };
        (field, err.into_inner().message().trim().to_owned())
    })
}

/// The keys a struct's derived `Deserialize` accepts: it names them when it
/// asks for a struct, which this deserializer records and then refuses.
fn keys_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut keys = None;
    let _ = T::deserialize(KeysOf(&mut keys));
    keys.unwrap_or(&[])
}

struct KeysOf<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for KeysOf<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("only the keys were wanted"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_of_a_listener_are_those_an_entry_may_set() {
        let keys = keys_of::<ListenerSettings>();
        for key in ["upstream", "sni_check", "routes", "allowed_source_cidrs", "xdp_interface"] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        assert!(!keys.contains(&"listen") && !keys.contains(&"dns_max_ttl"), "{keys:?}");
    }
}
