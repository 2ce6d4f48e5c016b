//! The progress of a hub download: bytes, rate and time left on a
//! terminal, nothing when standard error is not one.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A download's progress bar for `hf-hub`.
pub struct DownloadBar {
    bar: ProgressBar,
}

impl DownloadBar {
    /// A bar on standard error, drawn only when it is a terminal.
    pub fn stderr() -> Self {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// A bar drawn to `target`.
    pub fn with_target(target: ProgressDrawTarget) -> Self {
        let style = ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template");
        Self {
            bar: ProgressBar::with_draw_target(None, target).with_style(style),
        }
    }
}

impl hf_hub::api::Progress for DownloadBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        self.bar.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hf_hub::api::Progress;
    use indicatif::TermLike;
    use std::sync::{Arc, Mutex};

    /// A terminal that records what is written to it.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<String>>);

    impl TermLike for Recorder {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(&format!("{s}\n"));
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_terminal_sees_bytes_rate_and_time_left() {
        let terminal = Recorder::default();
        let mut bar =
            DownloadBar::with_target(ProgressDrawTarget::term_like(Box::new(terminal.clone())));
        bar.init(3 << 20, "pytorch_model.bin");
        bar.update(1 << 20);
        bar.update(2 << 20);
        bar.finish();
        let shown = terminal.0.lock().unwrap().clone();
        let last = shown
            .rsplit("pytorch_model.bin ")
            .next()
            .unwrap_or_default();
        assert!(
            last.starts_with("3.00 MiB/3.00 MiB ") && last.contains("B/s ETA "),
            "{shown:?}"
        );
    }
}
