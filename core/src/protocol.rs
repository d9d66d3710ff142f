//! [`Protocol`]: the transport protocols that Kubernetes ports (NetworkPolicy
//! port rules, container ports) and CNI port mappings name, with the
//! spellings each of them and nftables use.

use std::fmt;

/// A transport protocol a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The IP protocol number (nftables' `meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The name nftables uses, which is also the CNI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses nftables' (and CNI's) spelling, in any case.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Parses a Kubernetes `protocol` field: exactly `TCP`, `UDP` or
    /// `SCTP`, as the API server accepts them; unset means TCP.
    pub fn from_kubernetes(field: Option<&str>) -> Option<Protocol> {
        match field.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    #[test]
    fn nft_words_and_numbers() {
        let words: Vec<String> = ALL.iter().map(ToString::to_string).collect();
        assert_eq!(words, ["tcp", "udp", "sctp"]);
        let numbers: Vec<u8> = ALL.iter().map(|p| p.number()).collect();
        assert_eq!(numbers, [6, 17, 132]);
    }

    #[test]
    fn cni_spelling_parses_in_any_case() {
        for protocol in ALL {
            assert_eq!(Protocol::parse(protocol.as_str()), Some(protocol));
            let upper = protocol.as_str().to_ascii_uppercase();
            assert_eq!(Protocol::parse(&upper), Some(protocol));
        }
        assert_eq!(Protocol::parse("Udp"), Some(Protocol::Udp));
        assert_eq!(Protocol::parse("icmp"), None);
        assert_eq!(Protocol::parse(""), None);
    }

    #[test]
    fn kubernetes_spelling_is_upper_case_and_defaults_to_tcp() {
        assert_eq!(Protocol::from_kubernetes(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_kubernetes(Some("TCP")), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_kubernetes(Some("UDP")), Some(Protocol::Udp));
        assert_eq!(
            Protocol::from_kubernetes(Some("SCTP")),
            Some(Protocol::Sctp)
        );
        assert_eq!(Protocol::from_kubernetes(Some("tcp")), None);
        assert_eq!(Protocol::from_kubernetes(Some("ICMP")), None);
        assert_eq!(Protocol::from_kubernetes(Some("")), None);
    }
}
