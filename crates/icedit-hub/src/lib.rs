//! Model sources: Hub repos and local folders.
