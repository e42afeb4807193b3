//! Sluice GPU placement engine (see docs/architecture.md).
