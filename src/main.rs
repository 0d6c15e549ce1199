use clap::Parser;

use layerfs::cli::{Cli, normalize_args, run};

fn main() {
    let cli = Cli::parse_from(normalize_args(std::env::args_os().collect()));
    let default = match &cli.cmd {
        layerfs::cli::Cmd::Mount(a) if a.debug => "debug",
        // A log file was asked for: say what the mount is doing (data path, mounts, exits).
        layerfs::cli::Cmd::Mount(a) if a.log_file.is_some() => "info",
        _ => "warn",
    };
    // Commands that print die quietly on a closed pipe; a mount's daemon ignores SIGPIPE
    // (it sets that itself, since `container run` mounts too).
    if !matches!(cli.cmd, layerfs::cli::Cmd::Mount(_)) {
        layerfs::sys::sigpipe_default();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line whatever names the message quotes.
            eprintln!("layerfs: {}", layerfs::error::one_line(&e.to_string()));
            std::process::exit(1);
        }
    }
}
