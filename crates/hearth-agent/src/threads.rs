//! The agent's helper threads (output readers, stdin writers, exit watchers, the reaper): each
//! does one small thing with its buffers on the heap, so it gets a small stack and the agent's
//! memory stays small however many commands run. Starting one can fail (the guest is out of
//! tasks or memory): the caller gets the error and answers with it.

use std::io;

const HELPER_STACK: usize = 128 << 10;

pub fn helper(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(HELPER_STACK)
        .spawn(f)
        .map(drop)
}
