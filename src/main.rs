//! The `idkm` command line.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(&args.log);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A closed pipe (`idkm ... | head`) is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", message(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text
/// the message already holds (errors that print their source as well as
/// exposing it) and a path that the message just named.
fn message(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        // `loading F` then `F: what is wrong`: F once.
        let cause = match cause.split_once(": ") {
            Some((head, rest)) if text.ends_with(head) => rest,
            _ => &cause,
        };
        text.push_str(": ");
        text.push_str(cause);
    }
    text
}
