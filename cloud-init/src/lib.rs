//! kiln-cloud-init: typed cloud-init NoCloud seeds.
//!
//! The walking skeleton boots the tiny image, which has no cloud-init; the
//! seed types (meta-data, user-data, network-config v2, vendor-data) and the
//! cidata ISO writer land here with the golden image and the boot server.
