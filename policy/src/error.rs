//! Errors of loading and validating policy documents.

use std::fmt;

/// One problem in a policy document, with the path of the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path in the document, e.g. `tools.start-pod.limits[0].window`; empty for the root.
    pub path: String,
    /// What is wrong and what is allowed there.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is larger than [`crate::MAX_DOCUMENT_BYTES`].
    #[error("policy is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Neither valid YAML nor valid JSON (including duplicate keys).
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    /// Parsed, but something in it is wrong.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl Error {
    /// The individual problems (one for syntax and size errors).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Error::Invalid(p) => p.clone(),
            other => vec![Problem::new("", other.to_string())],
        }
    }

    /// A stable, low-cardinality label for metrics and Kubernetes Event reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::TooLarge { .. } => "too_large",
            Error::Syntax(_) => "syntax",
            Error::Invalid(_) => "invalid",
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
