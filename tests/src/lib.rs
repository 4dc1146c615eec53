//! Test support for toolgate's end-to-end tests.
#![forbid(unsafe_code)]
