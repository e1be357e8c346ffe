//! torch-compatible CPU random numbers (placeholder, being written).
