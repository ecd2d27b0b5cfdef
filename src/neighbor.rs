//! neighbor
