//! Reading and removing a hash map's entry in one system call
//! (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14), which aya offers for queues
//! and stacks only.
#![expect(
    unsafe_code,
    reason = "aya has no lookup-and-delete for hash maps: the bpf(2) call is made here"
)]

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// The value under `key`, removed from the map; `None` when there is none. An error (other
/// than no entry) when the kernel cannot remove hash entries this way: the caller reads the
/// entry instead.
pub(super) fn lookup_and_delete<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    // SAFETY: bpf_attr is plain data, for which all zeroes is the value the kernel expects in
    // every field this command does not use.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the map element commands use this member of the union; the pointers written
    // into it are to `key` and `value`, which outlive the call and are of the map's key and
    // value sizes (aya checked them when it made the typed `HashMap`).
    let ret = unsafe {
        let elem = &mut attr.__bindgen_anon_2;
        elem.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
        elem.key = std::ptr::from_ref(key) as u64;
        elem.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM as libc::c_long,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret == 0 {
        // SAFETY: on success the kernel wrote a whole value.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(error)
}
