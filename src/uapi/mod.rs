//! The WireGuard userspace API (cross-platform configuration protocol).
