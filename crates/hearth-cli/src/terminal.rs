//! The local terminal: raw mode for `exec -it`, and its size.

use anyhow::{Context, Result};
use hearth_api::PtySize;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Puts the terminal on stdin in raw mode until dropped: keys reach the guest as bytes (Ctrl-C
/// is 0x03), nothing is echoed or translated locally. Dropping restores the saved settings, on
/// a return, an error or a panic alike.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("setting the terminal raw")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSAFLUSH would drop keys typed meanwhile; TCSADRAIN lets pending output finish.
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The size of the terminal on stdout, else stdin; None when neither is one.
pub fn size() -> Option<PtySize> {
    [libc::STDOUT_FILENO, libc::STDIN_FILENO]
        .into_iter()
        .find_map(|fd| {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass.
            let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
            (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some(PtySize {
                cols: ws.ws_col,
                rows: ws.ws_row,
            })
        })
}
