# shellcheck shell=bash
# Private apt configurations for images/: packages from a Debian component or
# suite the machine is not configured for (netperf in non-free, the 6.12
# kernel in bookworm-backports), fetched through the archive URIs the machine
# already uses, without editing anything under /etc/apt.
#
# Sourced by images/build, images/resolve-kernel and images/install-headers.
#
#   private_apt_setup DIR COMPONENT [SUITE_SUFFIX]
#       write DIR/sources.list and refresh DIR/lists when missing or older
#       than a day.  Without SUITE_SUFFIX: every Debian suite of the machine
#       (bookworm, bookworm-updates) with COMPONENT.  With one (-backports):
#       each base suite plus the suffix (bookworm-backports) instead.
#   private_apt DIR apt-get-arguments...
#   private_apt_cache DIR apt-cache-arguments...
#
# IVLOOP_APT_ETC (default /etc/apt) is where the machine's sources are read
# from; the tests point it at a fixture.
#
# Only the package lists are private: dpkg's status and the keyrings are the
# machine's, so nothing installed is changed by these calls.

private_apt_opts() {	# the -o options pointing apt at DIR
	local dir=$1
	printf '%s\n' -o "Dir::Etc::sourcelist=$dir/sources.list" \
		-o Dir::Etc::sourceparts=- \
		-o "Dir::State::Lists=$dir/lists" \
		-o "Dir::Cache::pkgcache=$dir/pkgcache.bin" \
		-o "Dir::Cache::srcpkgcache=$dir/srcpkgcache.bin" \
		-o APT::Get::List-Cleanup=0
}

private_apt() {
	local dir=$1 opts
	shift
	mapfile -t opts < <(private_apt_opts "$dir")
	apt-get -q "${opts[@]}" "$@"
}

private_apt_cache() {
	local dir=$1 opts
	shift
	mapfile -t opts < <(private_apt_opts "$dir")
	apt-cache "${opts[@]}" "$@"
}

# Print one-line sources for COMPONENT derived from the machine's Debian
# archive entries (security and third-party repositories are left out).
private_apt_sources() {
	local component=$1 suffix=${2:-} f etc=${IVLOOP_APT_ETC:-/etc/apt}
	# deb822 .sources files
	for f in "$etc"/sources.list.d/*.sources; do
		[ -e "$f" ] || continue
		awk -v comp="$component" -v suffix="$suffix" '
			/^[Tt]ypes:/ { types=$0 } /^URIs:/ { uris=$2 } /^Suites:/ { $1=""; suites=$0 }
			/^Signed-By:/ { sb=$2 }
			/^$/ { emit() } END { emit() }
			function emit(  n, s, i) {
				if (types ~ /deb( |$)/ && uris ~ /debian\/?$/ && uris !~ /security/) {
					n = split(suites, s, " ")
					for (i = 1; i <= n; i++) {
						if (suffix != "" && s[i] ~ /-/)
							continue
						printf "deb [signed-by=%s] %s %s%s %s\n", sb, uris, s[i], suffix, comp
					}
				}
				types=""; uris=""; suites=""; sb=""
			}' "$f"
	done
	# one-line sources.list entries
	for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
		[ -e "$f" ] || continue
		awk -v comp="$component" -v suffix="$suffix" '
			$1 == "deb" && $0 !~ /security/ {
				opt=""; i=2; if ($2 ~ /^\[/) { opt=$2" "; i=3 }
				if ($i !~ /debian\/?$/ || (suffix != "" && $(i+1) ~ /-/))
					next
				print "deb " opt $i " " $(i+1) suffix " " comp }' "$f"
	done
}

private_apt_setup() {
	local dir=$1 component=$2 suffix=${3:-}
	mkdir -p "$dir/lists/partial"
	private_apt_sources "$component" "$suffix" | sort -u > "$dir/sources.list.new"
	if [ ! -s "$dir/sources.list.new" ]; then
		rm -f "$dir/sources.list.new"
		echo "no Debian archive source found in ${IVLOOP_APT_ETC:-/etc/apt} to derive '$component${suffix:+ ($suffix)}' from" >&2
		return 1
	fi
	local changed=0
	cmp -s "$dir/sources.list.new" "$dir/sources.list" || changed=1
	mv "$dir/sources.list.new" "$dir/sources.list"
	if [ $changed = 1 ] || [ ! -s "$dir/pkgcache.bin" ] ||
	   [ -z "$(find "$dir/lists" -maxdepth 1 -name '*Packages*' -print -quit)" ] ||
	   [ -n "$(find "$dir/lists" -maxdepth 1 -name '*Packages*' -mmin +1440 -print -quit)" ]; then
		private_apt "$dir" update >/dev/null || {
			echo "apt-get update failed for the private configuration in $dir" >&2
			return 1
		}
	fi
}
