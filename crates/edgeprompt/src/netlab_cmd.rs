//! `edgeprompt netlab`: the emulated cloud–edge link (network namespaces joined by a shaped link);
//! the work is in `ep-netlab`. This binary is also the helper that the library starts for its
//! hidden `forward`, `sink` and `source` subcommands when it runs from here.

pub use ep_netlab::cli::NetlabArgs;

pub fn run(args: NetlabArgs) -> anyhow::Result<()> {
    Ok(ep_netlab::cli::run(args)?)
}
