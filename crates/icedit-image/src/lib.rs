//! Image operations shared by the pipeline and the judges, written to give the same pixels as
//! the Python tools they are compared with.

pub mod resize;
