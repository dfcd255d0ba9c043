//! The local driver passes the conformance suite, with bubblewrap and with the chroot
//! fallback.

mod common;

mod bubblewrap {
    kiln_driver::conformance_tests!(super::common::setup(Some(super::common::bubblewrap())));
}

/// The chroot fallback needs root; elsewhere these tests run the bubblewrap sandbox again.
mod chroot {
    use kiln_driver_local::Sandbox;

    fn chroot() -> Sandbox {
        Sandbox::chroot_fallback().unwrap_or_else(super::common::bubblewrap)
    }

    kiln_driver::conformance_tests!(super::common::setup(Some(chroot())));
}
