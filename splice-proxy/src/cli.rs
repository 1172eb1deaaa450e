//! Command line. Every flag can also be set in the TOML config file (the key
//! is the flag's name with `_` for `-`); a flag given on the command line
//! wins. The options themselves are `config::Options`; `--help` shows the
//! defaults of `config::defaults`.

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::config::{Options, defaults};

const EXIT_CODES: &str = "\
Exit codes:
  0  stopped by SIGTERM (after the drain) or SIGINT; check-config: the configuration is valid
  1  failed while running (the log says why)
  2  invalid command line or configuration (the message names the field)
  3  a listen, admin or health-check address could not be bound (the message names it)";

#[derive(Debug, Parser)]
#[command(
    name = "splice-proxy",
    version,
    about = "TCP passthrough proxy for a private EKS API server: resolves the upstream \
             name for every new connection and forwards the TLS session untouched.",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration (config file plus any flags) and exit: 0 when
    /// valid, 2 with the bad field named otherwise. Binds nothing.
    CheckConfig(Box<Options>),
    /// Internal: the packet plane's reset helper, which the proxy starts
    /// itself (see `dataplane::packet::reset_helper`).
    #[command(name = "packet-reset-helper", hide = true)]
    PacketResetHelper {
        #[arg(long, value_enum, default_value_t)]
        log_format: crate::config::LogFormat,
    },
}

impl Cli {
    /// The command line of this process (exits with the usage on a bad one,
    /// or after `--help` and `--version`).
    #[must_use]
    pub fn from_args() -> Self {
        let matches = command().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// The command with each flag's default (from `config::defaults`) at the
/// end of its help, on the proxy and on `check-config` alike.
#[must_use]
pub fn command() -> clap::Command {
    let with_defaults = |mut command: clap::Command| {
        for (id, default) in defaults::shown_in_help() {
            command = command.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help}. [default: {default}]"))
            });
        }
        command
    };
    with_defaults(Cli::command()).mut_subcommand("check-config", with_defaults)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_definition_is_consistent() {
        super::command().debug_assert();
    }

    /// Every default the help names comes from `config::defaults`, and
    /// every one of those is shown on its own flag.
    #[test]
    fn help_shows_the_defaults_the_configuration_applies() {
        let help = super::command().render_help().to_string();
        for (id, default) in super::defaults::shown_in_help() {
            let command = super::command();
            let arg = command.get_arguments().find(|a| a.get_id() == id).expect(id);
            let long = arg.get_long().expect(id);
            let help_of_arg = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help_of_arg.ends_with(&format!("[default: {default}]")), "--{long}: {help_of_arg}");
            assert_eq!(help_of_arg.matches("[default:").count(), 1, "--{long}: {help_of_arg}");
        }
        let written_in_docs: Vec<_> = Cli::command()
            .get_arguments()
            .filter(|a| a.get_help().is_some_and(|h| h.to_string().contains("[default:")))
            .map(|a| a.get_id().to_string())
            .collect();
        assert_eq!(written_in_docs, ["allowed_sni", "health_listen"], "defaults written by hand: {help}");
    }
}
