//! The host agent library (filled by the agent issue). Nothing here runs yet.
#![forbid(unsafe_code)]
