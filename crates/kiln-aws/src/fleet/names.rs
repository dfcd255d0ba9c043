//! The names of the AWS resources kiln creates: deterministic, so that every call can find
//! what an earlier (possibly crashed) call made, and within AWS's limits.

use sha2::{Digest, Sha256};

/// Longest target group and load balancer name.
const ELB_NAME_MAX: usize = 32;
/// Longest launch template name.
const LAUNCH_TEMPLATE_NAME_MAX: usize = 128;
/// Longest Auto Scaling group name.
const ASG_NAME_MAX: usize = 255;
/// Hex characters of the hash appended to a shortened name.
const HASH_CHARS: usize = 6;

/// `kiln-{project}-{service}`: one launch template per service, one version per release.
pub(crate) fn launch_template(project: &str, service: &str) -> String {
    bounded(
        &format!("kiln-{project}-{service}"),
        LAUNCH_TEMPLATE_NAME_MAX,
    )
}

/// `kiln-{project}-{service}-v{release}`: one Auto Scaling group per release.
pub(crate) fn auto_scaling_group(project: &str, service: &str, release: u32) -> String {
    bounded(
        &format!("kiln-{project}-{service}-v{release}"),
        ASG_NAME_MAX,
    )
}

/// `k-{project}-{service}-v{release}`: one target group per release.
pub(crate) fn target_group(project: &str, service: &str, release: u32) -> String {
    bounded(&format!("k-{project}-{service}-v{release}"), ELB_NAME_MAX)
}

/// `k-{project}-{balancer}`: one application load balancer per balancer.
pub(crate) fn load_balancer(project: &str, balancer: &str) -> String {
    bounded(&format!("k-{project}-{balancer}"), ELB_NAME_MAX)
}

/// `full` when it is at most `max` characters of letters, digits and hyphens and does not end
/// with a hyphen; otherwise a prefix of it (other characters turned into hyphens) followed by
/// `-` and the first 6 hex characters of the sha256 of `full`, at most `max` characters in all.
///
/// Every name passed here starts with `k-` or `kiln-`, so the result never starts with a
/// hyphen (nor with `internal-`, which load balancer names must not).
fn bounded(full: &str, max: usize) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-';
    if full.len() <= max && full.chars().all(allowed) && !full.ends_with('-') {
        return full.to_owned();
    }
    let clean: String = full
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .collect();
    let hash = hex::encode(Sha256::digest(full.as_bytes()));
    let keep = max - HASH_CHARS - 1;
    // `clean` is ASCII, so any byte index is a character boundary.
    let prefix = clean[..keep.min(clean.len())].trim_end_matches('-');
    format!("{prefix}-{}", &hash[..HASH_CHARS])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elb_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= ELB_NAME_MAX
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.starts_with("internal-")
    }

    #[test]
    fn short_names_are_kept_as_they_are() {
        assert_eq!(launch_template("shop", "web"), "kiln-shop-web");
        assert_eq!(auto_scaling_group("shop", "web", 12), "kiln-shop-web-v12");
        assert_eq!(target_group("shop", "web", 12), "k-shop-web-v12");
        assert_eq!(load_balancer("shop", "public"), "k-shop-public");
        // Exactly 32 characters still fits.
        let name = target_group("p23456789012345", "s2345678", 1234);
        assert_eq!(name.len(), 32);
        assert_eq!(name, "k-p23456789012345-s2345678-v1234");
    }

    #[test]
    fn long_names_are_shortened_with_a_hash() {
        let project = "a-rather-long-project-name";
        let service = "checkout-service";
        let tg = target_group(project, service, 7);
        assert!(elb_valid(&tg), "{tg}");
        assert_eq!(tg.len(), ELB_NAME_MAX);
        assert!(tg.starts_with("k-a-rather-long-project-"), "{tg}");
        let full = format!("k-{project}-{service}-v7");
        let hash = hex::encode(Sha256::digest(full.as_bytes()));
        assert!(tg.ends_with(&format!("-{}", &hash[..6])), "{tg}");

        let lb = load_balancer(project, "public-entrypoint");
        assert!(elb_valid(&lb), "{lb}");
        // A prefix cut right after a hyphen does not leave two hyphens in a row.
        assert!(!lb.contains("--"), "{lb}");

        let lt = launch_template(&"p".repeat(200), "web");
        assert_eq!(lt.len(), LAUNCH_TEMPLATE_NAME_MAX);
        let asg = auto_scaling_group(&"p".repeat(300), "web", 1);
        assert_eq!(asg.len(), ASG_NAME_MAX);
    }

    #[test]
    fn names_are_deterministic_and_distinct() {
        let (project, service) = ("a-rather-long-project-name", "checkout-service");
        assert_eq!(
            target_group(project, service, 3),
            target_group(project, service, 3)
        );
        let names: std::collections::BTreeSet<String> = (0..200)
            .map(|release| target_group(project, service, release))
            .collect();
        assert_eq!(names.len(), 200);
        assert!(names.iter().all(|n| elb_valid(n)));
        assert_ne!(
            load_balancer(project, "public-entrypoint-a"),
            load_balancer(project, "public-entrypoint-b")
        );
    }

    #[test]
    fn other_characters_become_hyphens_and_add_a_hash() {
        let tg = target_group("my_app", "web.api", 1);
        assert!(elb_valid(&tg), "{tg}");
        assert!(tg.starts_with("k-my-app-web-api-v1-"), "{tg}");
        // Distinct from the name whose characters were already hyphens.
        assert_ne!(tg, target_group("my-app", "web-api", 1));
        assert_eq!(target_group("my-app", "web-api", 1), "k-my-app-web-api-v1");
        // A trailing hyphen is not allowed either.
        let lb = load_balancer("shop", "edge-");
        assert!(elb_valid(&lb), "{lb}");
    }
}
