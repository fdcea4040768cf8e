//! placeholder until the fakes are written
