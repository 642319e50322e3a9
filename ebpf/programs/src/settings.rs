//! Read-only settings the agent writes into the object before loading it
//! (`EbpfLoader::set_global`). The verifier sees them as constants, so reading them is free.

/// SO_MARK carried by every proxy socket; connects from such sockets are never captured.
#[unsafe(no_mangle)]
static PROXY_MARK: u32 = 0;
/// SO_MARK of the proxy's sockets that reach an application with the client's address as
/// their source (IP_TRANSPARENT); never captured either.
#[unsafe(no_mangle)]
static TRANSPARENT_MARK: u32 = 0;
#[unsafe(no_mangle)]
static OUTBOUND_PORT: u16 = 15001;
#[unsafe(no_mangle)]
static HBONE_PORT: u16 = 15008;

#[inline(always)]
fn read<T: Copy>(value: &'static T) -> T {
    // SAFETY: a volatile read of a static keeps the compiler from folding in the placeholder
    // value; the loader has replaced it by then.
    unsafe { core::ptr::read_volatile(value) }
}

/// Whether a socket mark is one of the proxy's.
#[inline(always)]
pub fn is_proxy_mark(mark: u32) -> bool {
    mark == read(&PROXY_MARK) || mark == read(&TRANSPARENT_MARK)
}

#[inline(always)]
pub fn outbound_port() -> u16 {
    read(&OUTBOUND_PORT)
}

#[inline(always)]
pub fn hbone_port() -> u16 {
    read(&HBONE_PORT)
}
