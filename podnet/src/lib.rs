//! Weft shared library.
