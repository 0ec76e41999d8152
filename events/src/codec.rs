//! The wire codec: msgpack with named fields for events (and by default for commands), JSON for commands
//! when the publisher says `Content-Type: application/json`. Decode errors name the field path, so a Brain
//! written in another language learns exactly what to fix.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Event;

/// Header carrying JetStream's de-duplication id.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the payload encoding.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// Header carrying the event kind, so tools can filter without decoding.
pub const HEADER_KIND: &str = "Taskpods-Kind";
/// Header for JetStream's optimistic concurrency on a subject.
pub const HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// The content type we write.
pub const MSGPACK: &str = "application/msgpack";
/// The content type of JSON commands.
pub const JSON: &str = "application/json";

/// How a payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    /// msgpack with named fields (the default when no header is given).
    #[default]
    Msgpack,
    /// JSON.
    Json,
}

impl Encoding {
    /// The encoding a `Content-Type` header names (`None`: no header, msgpack).
    pub fn from_content_type(value: Option<&str>) -> Result<Self, CodecError> {
        let Some(value) = value else {
            return Ok(Self::Msgpack);
        };
        if value.contains(char::is_control) {
            return Err(CodecError::UnsupportedContentType(value.to_owned()));
        }
        let media = value.split(';').next().unwrap_or("").trim();
        match media.to_ascii_lowercase().as_str() {
            "" | "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Ok(Self::Msgpack)
            }
            "application/json" | "text/json" => Ok(Self::Json),
            _ => Err(CodecError::UnsupportedContentType(value.to_owned())),
        }
    }

    /// The `Content-Type` header value for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Msgpack => MSGPACK,
            Self::Json => JSON,
        }
    }
}

/// Codec failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The payload could not be decoded; `path` is the field where it went wrong (`.` for the top).
    #[error("cannot decode {what} ({encoding:?}) at {path}: {message}")]
    Decode {
        /// What was being decoded (e.g. `launch command`).
        what: &'static str,
        /// The encoding tried.
        encoding: Encoding,
        /// The field path where decoding failed.
        path: String,
        /// The decoder's message.
        message: String,
    },
    /// The value could not be encoded (a bug: every type here is encodable).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The `Content-Type` header names an encoding we do not speak.
    #[error("unsupported content type {0:?}: use application/msgpack or application/json")]
    UnsupportedContentType(String),
    /// The payload is larger than allowed.
    #[error("payload is {size} bytes; at most {max} are allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Encodes as msgpack with named fields (stable across field reordering, readable by any client), in the
/// human-readable form: a task id is its hyphenated string, as in JSON and in the documentation, not the
/// 16 raw bytes rmp-serde writes for a `Uuid` by default.
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::new();
    let mut serializer = rmp_serde::Serializer::new(&mut bytes)
        .with_struct_map()
        .with_human_readable();
    value
        .serialize(&mut serializer)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(bytes)
}

/// Encodes in `encoding`.
pub fn encode<T: Serialize + ?Sized>(value: &T, encoding: Encoding) -> Result<Vec<u8>, CodecError> {
    match encoding {
        Encoding::Msgpack => to_msgpack(value),
        Encoding::Json => serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string())),
    }
}

/// Decodes `bytes` as `encoding`, naming the field path of the first problem.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    encoding: Encoding,
) -> Result<T, CodecError> {
    let error = |path: String, message: String| CodecError::Decode {
        what,
        encoding,
        path: if path.is_empty() || path == "." {
            ".".to_owned()
        } else {
            path
        },
        message,
    };
    match encoding {
        Encoding::Msgpack => {
            // Human-readable, so ids are read as strings; uuid's string visitor also takes the 16-byte
            // form that events written before ids were strings carry.
            let mut cursor = std::io::Cursor::new(bytes);
            let mut de = rmp_serde::Deserializer::new(&mut cursor).with_human_readable();
            let value: T = serde_path_to_error::deserialize(&mut de)
                .map_err(|e| error(e.path().to_string(), e.inner().to_string()))?;
            let used = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            if used < bytes.len() {
                return Err(error(
                    ".".into(),
                    format!("{} trailing bytes after the value", bytes.len() - used),
                ));
            }
            Ok(value)
        }
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let value: T = serde_path_to_error::deserialize(&mut de)
                .map_err(|e| error(e.path().to_string(), e.inner().to_string()))?;
            de.end().map_err(|e| error(".".into(), e.to_string()))?;
            Ok(value)
        }
    }
}

/// Encodes an event for the event stream.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, CodecError> {
    to_msgpack(event)
}

/// Decodes an event from the event stream; unknown kinds decode to `EventBody::Unknown`.
pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    decode("event", bytes, Encoding::Msgpack)
}
