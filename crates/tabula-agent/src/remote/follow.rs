//! Following the leader among several controller addresses: which address to try after one
//! failed. Pure, so the rules are tested without a network.

/// Why the controller at the current address will not do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// It answered that it is a standby, naming the leader when it knows one.
    NotLeader(Option<String>),
    /// No answer: refused, reset, timed out, or something that does not speak tabula.
    Unreachable,
    /// It answered as a leader of an older epoch than this agent has seen: deposed.
    StaleEpoch,
}

/// Where to go next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// The address at this index of the list.
    Index(usize),
    /// A leader's address that is not in the list (it advertises another name for itself).
    Add(String),
}

/// `http://` when no scheme is given, no trailing slash: the form addresses are compared in.
pub fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// The addresses of a `--controller` list (`URL[,URL...]`), normalized, without duplicates.
pub fn parse_list(list: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for u in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let u = normalize(u);
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    if urls.is_empty() {
        return Err(format!(
            "no controller address in {list:?}: give one or more as URL[,URL...], e.g. http://10.0.0.1:7700,http://10.0.0.2:7700"
        ));
    }
    Ok(urls)
}

/// After the controller at `urls[current]` failed with `failure`: the leader it named, else
/// the next address in the list. A hint naming the address that just failed is stale (that
/// controller no longer leads, or cannot be reached): it is passed over.
pub fn next_controller(urls: &[String], current: usize, failure: &Failure) -> Next {
    if let Failure::NotLeader(Some(hint)) = failure {
        let hint = normalize(hint);
        match urls.iter().position(|u| *u == hint) {
            Some(i) if i != current => return Next::Index(i),
            Some(_) => {}
            None => return Next::Add(hint),
        }
    }
    Next::Index((current + 1) % urls.len().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Vec<String> {
        parse_list("http://a:1, b:2/ ,http://c:3,http://a:1").unwrap()
    }

    #[test]
    fn lists_are_normalized_and_deduplicated() {
        assert_eq!(list(), ["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(
            parse_list("127.0.0.1:7700").unwrap(),
            ["http://127.0.0.1:7700"]
        );
        let e = parse_list(" , ").unwrap_err();
        assert!(e.contains("URL[,URL...]"), "{e}");
    }

    #[test]
    fn a_failure_without_a_hint_moves_to_the_next_address_and_wraps() {
        let l = list();
        for f in [
            Failure::Unreachable,
            Failure::StaleEpoch,
            Failure::NotLeader(None),
        ] {
            assert_eq!(next_controller(&l, 0, &f), Next::Index(1), "{f:?}");
            assert_eq!(next_controller(&l, 2, &f), Next::Index(0), "{f:?}");
        }
        // One address: nowhere else to go.
        let one = parse_list("http://a:1").unwrap();
        assert_eq!(
            next_controller(&one, 0, &Failure::Unreachable),
            Next::Index(0)
        );
    }

    #[test]
    fn a_hint_goes_to_the_leader_it_names() {
        let l = list();
        let hint = |h: &str| Failure::NotLeader(Some(h.to_string()));
        // Compared normalized: the standby may write it without a scheme or with a slash.
        assert_eq!(next_controller(&l, 0, &hint("http://c:3")), Next::Index(2));
        assert_eq!(next_controller(&l, 0, &hint("c:3/")), Next::Index(2));
        // A leader outside the list is added.
        assert_eq!(
            next_controller(&l, 1, &hint("http://d:4")),
            Next::Add("http://d:4".into())
        );
        // A hint naming the controller that just refused is stale: next address.
        assert_eq!(next_controller(&l, 1, &hint("http://b:2")), Next::Index(2));
        // Only a standby's answer carries a hint.
        assert_eq!(next_controller(&l, 0, &Failure::StaleEpoch), Next::Index(1));
    }
}
